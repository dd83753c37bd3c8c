"""The guard and its pipeline: views and scoring, policy routing, answering, moderation, streaming,
the decisions for models the guard does not host, the integrations' binding, and the decision log."""
