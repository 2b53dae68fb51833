"""`python -m kvrelay` is the `kvrelay` command."""

from kvrelay.ops.cli import main

if __name__ == "__main__":
    main()
