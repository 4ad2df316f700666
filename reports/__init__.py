"""Tables and figures rendered from what diagnostics measured; pandas and matplotlib only, never torch."""
