"""Entry point of ``python -m mmts_search`` (what a submitted Ray job runs)."""

from mmts_search.cli import main

if __name__ == "__main__":
    main()
