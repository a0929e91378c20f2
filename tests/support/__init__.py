"""Per-area test helpers (imported as ``support.<area>``; tests/ is on sys.path via conftest)."""
