"""Dense prediction tests (a package, so that test module names may repeat those of other test folders)."""
