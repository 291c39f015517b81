"""sync_svc: the show's clock: show state, voting windows and countdowns."""
