"""The evaluation and training toolkit: labelled data, fitting (the shipped default's recipe
included), feature extraction and its cache, metrics, quality and end-to-end evaluations, reports,
baselines and the Ray extraction engine.

It drives the runtime (:mod:`mlpm_guard`); the runtime reaches into it only for the end-to-end
system protocol the package exports (``Answer``, ``ExternalSystem``), the CLI's toolkit commands,
and the seed-set fit of a backbone that has no shipped prototypes.
"""
