"""`python -m dashboard`: serve the web UI (see dashboard.cli)."""

from dashboard.cli import main

if __name__ == "__main__":
    main()
