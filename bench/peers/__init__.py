"""Harnesses that run earmark's peers (SMDA, MCRIT) in-process, in the same run as earmark.

The peers are optional (``pip install -e '.[bench]'``); each module imports its peer lazily
and raises :class:`PeerUnavailableError` with the install hint when it is missing.
"""

from __future__ import annotations

import logging
import os


class PeerUnavailableError(RuntimeError):
    """The peer package is not installed in this environment."""


def quiet_peer_output() -> None:
    """Silence the peers' progress bars and INFO logging before they are imported.

    MCRIT calls logging.basicConfig(INFO) at import time and wraps every loop in tqdm; in a
    benchmark that output dwarfs the results and costs time. TQDM_DISABLE is read by tqdm itself.
    """
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in ("smda", "mcrit"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # With MemoryStorage, MCRIT's query matcher always falls back from vectorised to per-pair
    # scoring and warns once per query; that is MCRIT's own in-memory behaviour, documented in
    # bench/README.md, not something a benchmark reader needs repeated per file.
    logging.getLogger("mcrit.matchers.MatcherInterface").setLevel(logging.ERROR)
    # SMDA logs one ERROR line per AVX-512 compare it cannot escape (vpcmpequq, ...), thousands
    # per OpenSSL build; the mnemonic stays unescaped in MCRIT's shingles (noted in the README).
    logging.getLogger("smda.intel.IntelInstructionEscaper").setLevel(logging.CRITICAL)
