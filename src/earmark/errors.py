"""The exceptions earmark raises on purpose, and the CLI exit code of each.

    EarmarkError                      exit 1   base of everything below
    ├── InputError                    exit 10  a sample (or file) we refuse or cannot read
    │   ├── EmptyFileError            exit 11  zero-length file
    │   ├── FileTooLargeError         exit 12  over ``Limits.max_file_bytes``
    │   ├── UnsupportedFormatError    exit 13  not PE/ELF (wrong magic) or unsupported arch
    │   ├── MalformedFileError        exit 14  truncated, overlapping or absurd headers
    │   └── AnalysisTimeoutError      exit 15  over ``Limits.max_seconds_per_sample``
    ├── FeaturesFileError             exit 20  a frozen features file that is not ours or is damaged
    │   └── FeaturesVersionError      exit 21  written by an incompatible format version
    ├── StoreError                    exit 30  the knowledge base cannot be opened or written
    │   └── IndexCacheError           exit 31  a persisted function index is damaged
    ├── IntelError                    exit 40  threat-intel input we cannot import
    ├── DemoBuildError                exit 50  the demo corpus cannot be built
    └── UsageError                    exit 2   bad arguments that click could not catch

Unknown errors are not wrapped: they propagate, so a bug shows as a bug.
"""

from __future__ import annotations


class EarmarkError(Exception):
    """Base of all deliberate earmark errors."""

    exit_code = 1


class InputError(EarmarkError):
    """A sample we refuse or cannot read; the rest of a batch goes on."""

    exit_code = 10


class EmptyFileError(InputError):
    exit_code = 11


class FileTooLargeError(InputError):
    exit_code = 12


class UnsupportedFormatError(InputError):
    exit_code = 13


class MalformedFileError(InputError):
    exit_code = 14


class AnalysisTimeoutError(InputError):
    exit_code = 15


class FeaturesFileError(EarmarkError):
    exit_code = 20


class FeaturesVersionError(FeaturesFileError):
    exit_code = 21


class StoreError(EarmarkError):
    exit_code = 30


class IndexCacheError(StoreError):
    """A persisted index that is damaged or was written by another format version."""

    exit_code = 31


class IntelError(EarmarkError):
    exit_code = 40


class DemoBuildError(EarmarkError):
    """The demo corpus could not be built: no compiler, a failed compile or link, a bad option."""

    exit_code = 50


class UsageError(EarmarkError):
    exit_code = 2
