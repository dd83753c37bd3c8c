"""The default prototypes: shipped in the package for the embedded backbone, a seed-set fit otherwise."""

from __future__ import annotations

import hashlib
import logging
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from .._io import cache_home
from .._version import __version__
from ..vocabulary.errors import BackboneMismatchError
from .prototype_file import FORMAT_VERSION, META_FILE
from .prototypes import Prototypes

if TYPE_CHECKING:
    from ..model.backbone import Backbone

logger = logging.getLogger(__name__)


def shipped_prototypes_dir() -> Path:
    """Where the package keeps the prototypes fitted at release time for the embedded backbone."""
    return Path(str(resources.files("mlpm_guard") / "resources" / "default_prototypes"))


def default_prototypes(backbone: Backbone, *, progress: bool = True) -> Prototypes:
    """The default prototypes for ``backbone``.

    For the embedded backbone these are the prototypes shipped in the package (fitted at release
    time with :func:`mlpm_guard.toolkit.training.fit_release`): nothing is fitted on first use. Any other backbone gets
    prototypes fitted on the built-in seed set, once, then cached.
    """
    shipped = shipped_prototypes_dir()
    if (shipped / META_FILE).is_file():
        try:
            return Prototypes.load(shipped, backbone=backbone)
        except BackboneMismatchError:
            pass  # another backbone: the seed-set fit below
    # Another backbone: the seed-set fit, the one use of the toolkit at run time.
    from ..toolkit.data import seed_digest, seed_examples
    from ..toolkit.training import DEFAULT_PARAMS, fit_examples, release_heads, training_mix

    params = hashlib.sha256(repr(sorted(DEFAULT_PARAMS.items())).encode()).hexdigest()[:8]
    seeds = f"{seed_digest()}{seed_digest('seed_answers.jsonl')[:4]}{seed_digest('seed_content.jsonl')[:4]}"
    name = f"seed-{backbone.fingerprint}-{seeds}-{params}-v{__version__}-f{FORMAT_VERSION}"
    folder = cache_home() / "prototypes" / name
    if (folder / META_FILE).is_file():
        return Prototypes.load(folder, backbone=backbone)
    logger.warning("no shipped prototypes for backbone %s: fitting default prototypes on the built-in seed set "
                   "(first use only, then cached in %s)", getattr(backbone, "name", backbone), folder)
    prototypes = fit_examples(backbone, training_mix(seed_examples()), progress=progress)
    for kind, head in release_heads(backbone, prototypes, progress=progress).items():
        prototypes.set_head(kind, head)
    prototypes.save(folder)
    return prototypes
