"""Speed benchmark (see pio_fvlm/bench.py for what it measures). Same as `pio-fvlm bench`."""

from pio_fvlm.bench import main

if __name__ == "__main__":
    main()
