"""``python -m padnet`` runs the command line."""

from padnet.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
