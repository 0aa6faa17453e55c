"""Host library and the mmfree command line."""
