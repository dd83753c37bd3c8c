"""The evaluation and training toolkit: labelled data, fitting (the shipped default's recipe
included), feature extraction and its cache, metrics, quality and end-to-end evaluations, reports,
baselines and the Ray extraction engine.

It drives the runtime (:mod:`mlpm_guard`); the runtime reaches into it only for the CLI's toolkit
commands and the seed-set fit of a backbone that has no shipped prototypes, so ``import
mlpm_guard`` loads none of it (the end-to-end system protocol, ``Answer`` and ``ExternalSystem``,
lives in :mod:`mlpm_guard.guardrail.answers`).
"""
