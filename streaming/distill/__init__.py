"""`mmrec distill`: layer-wise and end-to-end distillation of a converted MM-Rec from its streamed source.

teacher.py (the source through transformers, one layer in memory), activations.py (calibration activations
in RAM or memory-mapped files), layerwise.py (one block against one layer), end_to_end.py (top-k KL of the
whole student), run.py (the command: inputs, resume journal, output).
"""
