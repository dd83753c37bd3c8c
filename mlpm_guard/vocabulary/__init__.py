"""The vocabulary every part speaks: verdicts, tiers, routes, categories, the decision record,
conversations and errors."""
