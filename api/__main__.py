"""`python -m api`: the `fedcore` command line."""

from api.cli import main

if __name__ == "__main__":
    main()
