"""``python -m rayalign ...``: the ``rayalign`` command, for environments without its script on PATH."""

from rayalign.cli import main

if __name__ == "__main__":
    main()
