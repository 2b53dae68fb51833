"""`python -m relay` is the `kvrelay` command."""

from relay.cli import main

if __name__ == "__main__":
    main()
