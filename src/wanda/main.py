"""``python -m wanda.main``: the original code's entry point."""

from .cli.main import main

if __name__ == "__main__":
    main()
