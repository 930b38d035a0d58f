"""lm-evaluation-harness on a converted MM-Rec directory, offline.

    python -m mmrec.hf.lm_eval --model_args pretrained=DIR --text held_out.txt [any lm_eval option ...]

is `lm_eval --model hf ...` with two additions: it imports mmrec.hf first (so transformers' Auto classes know
model_type "mmrec"), and `--text FILE` adds a local perplexity task, `mmrec_text`: each non-blank line of
FILE is one document, scored with loglikelihood_rolling (word/byte perplexity, bits per byte). It sets
HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE unless they are set already.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

TEXT_TASK = "mmrec_text"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")

# lm_eval resolves `!function module.name` next to the YAML file, so the helper is written beside it.
_DOCS_MODULE = '''def drop_blank_lines(dataset):
    """One document per non-blank line."""
    return dataset.filter(lambda doc: doc["text"].strip() != "")
'''


def text_task_yaml(text_file: str | os.PathLike, name: str = TEXT_TASK) -> str:
    """The task's YAML: loglikelihood_rolling over the non-blank lines of a local text file."""
    path = Path(text_file).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such text file")
    return "\n".join([
        f"task: {name}",
        "dataset_path: text",  # datasets' built-in loader for local .txt files: nothing is downloaded
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(path))}",
        "test_split: test",
        f"process_docs: !function {name}_docs.drop_blank_lines",
        "output_type: loglikelihood_rolling",
        'doc_to_text: ""',
        'doc_to_target: "{{text}}"',
        "metric_list:",
        "  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}",
        "  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}",
        "  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}",
        "metadata:",
        "  version: 1.0",
        ""])


def write_text_task(text_file: str | os.PathLike, directory: str | os.PathLike, name: str = TEXT_TASK) -> Path:
    """Write the task into `directory` (give it to lm_eval as --include_path / TaskManager(include_path))."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.yaml").write_text(text_task_yaml(text_file, name))
    (directory / f"{name}_docs.py").write_text(_DOCS_MODULE)
    return directory


def _pop_option(argv: list[str], option: str) -> str | None:
    """Remove `option VALUE` / `option=VALUE` from argv and return VALUE."""
    for i, arg in enumerate(argv):
        if arg == option:
            if i + 1 >= len(argv):
                raise SystemExit(f"{option} needs a value")
            value = argv[i + 1]
            del argv[i:i + 2]
            return value
        if arg.startswith(option + "="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def _go_offline() -> None:
    """Offline unless the caller said otherwise. `python -m mmrec.hf.lm_eval` has imported huggingface_hub
    (through mmrec.hf) before this runs, and it reads HF_HUB_OFFLINE at import: set its constant too."""
    for variable in OFFLINE_VARIABLES:
        os.environ.setdefault(variable, "1")
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None and os.environ["HF_HUB_OFFLINE"].lower() in ("1", "true", "yes", "on"):
        hub_constants.HF_HUB_OFFLINE = True


def main(argv: list[str] | None = None) -> None:
    _go_offline()
    argv = list(sys.argv[1:] if argv is None else argv)
    text = _pop_option(argv, "--text")
    import mmrec.hf  # noqa: F401  registers model_type "mmrec" with AutoConfig / AutoModelForCausalLM

    if "--model" not in argv and not any(a.startswith("--model=") for a in argv):
        argv = ["--model", "hf", *argv]
    from lm_eval.__main__ import cli_evaluate

    with tempfile.TemporaryDirectory(prefix="mmrec-lm-eval-") as task_dir:
        if text is not None:
            try:
                write_text_task(text, task_dir)
            except FileNotFoundError as exc:
                raise SystemExit(f"error: {exc}") from None
            argv += ["--include_path", task_dir]
            if "--tasks" not in argv and not any(a.startswith("--tasks=") for a in argv):
                argv += ["--tasks", TEXT_TASK]
        sys.argv = ["lm_eval", "run", *argv]
        cli_evaluate()


if __name__ == "__main__":
    main()
