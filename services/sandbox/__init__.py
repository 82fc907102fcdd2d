"""The sandbox processor: a stand-in for a real payout processor (separate app, port 8010)."""
