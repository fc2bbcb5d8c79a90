"""Project tools outside the installed packages: run from the repository root (`python -m tools.toy.report`)."""
