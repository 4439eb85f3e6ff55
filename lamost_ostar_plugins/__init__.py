"""Optional plugins of lamost_ostar (stages, readers), registered through entry points; the core never imports them."""
