"""pytest settings for nbval (design.md §3): what a notebook run is compared on, and how long it may wait."""

# Library warnings (deprecations, torch's log lines) go to stderr and change between releases;
# a lesson's claims are printed to stdout and asserted, so stderr is not compared.
SKIP_COMPARE_EXTRA = ("stderr",)
OUTPUT_TIMEOUT_S = 120  # nbval waits only 5 s for a cell's last output by default


def pytest_collection_modifyitems(items):
    for item in items:
        if type(item).__name__ == "IPyNbCell":
            item.output_timeout = OUTPUT_TIMEOUT_S
            parent = item.parent
            missing = tuple(key for key in SKIP_COMPARE_EXTRA if key not in parent.skip_compare)
            parent.skip_compare = parent.skip_compare + missing
