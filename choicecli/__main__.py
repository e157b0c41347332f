"""Allow `python -m choicecli`."""

from choicecli.cli import main

if __name__ == "__main__":
    main()
