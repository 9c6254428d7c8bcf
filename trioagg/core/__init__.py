"""The core: the event, its roll-up, times, tiers, settings, the error tree and the
answer shapes. Pure data and arithmetic; it imports nothing else of trioagg."""
