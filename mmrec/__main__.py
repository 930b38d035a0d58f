"""`python -m mmrec ...` is the `mmrec` command."""

from mmrec.cli.app import main

if __name__ == "__main__":
    main()
