"""Named limits and tunables. Each comment gives the reason or the measurement behind the value.

The full table, with the trade-offs, is in ``docs/tuning.md``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on every parser path, so a hostile sample cannot exhaust time or memory."""

    # Largest sample accepted. Real malware rarely exceeds 50 MB; installers that do are
    # not attribution material and would cost seconds of parsing each.
    max_file_bytes: int = 128 * 1024 * 1024
    # PE allows 96 sections by spec (Windows loader); ELF files with more are fuzzed or packed.
    max_sections: int = 256
    # A section whose virtual size exceeds its file size by more than this is not mapped
    # (huge-virtual-size trick); we only disassemble bytes that exist in the file.
    max_virtual_size: int = 512 * 1024 * 1024
    # Functions kept per sample. Large static builds (OpenSSL-in-a-DLL) reach ~12k.
    max_functions: int = 50_000
    # Instructions decoded per function; longer "functions" are data or obfuscation.
    max_instructions_per_function: int = 20_000
    # Wall-clock budget per sample, checked between functions.
    max_seconds_per_sample: float = 120.0
    # Strings kept per sample (ASCII + UTF-16LE), longest files have ~10^6 junk strings.
    max_strings: int = 200_000
    # Shortest string extracted, as `strings -n 5` does; 4 gives mostly noise in code.
    min_string_length: int = 5
    # Bytes of decompressed data allowed out of one archive member (zip bombs).
    max_archive_member_bytes: int = 256 * 1024 * 1024


DEFAULT_LIMITS = Limits()

# Actor taxonomy used when reading intel and labels (earmark.intel.aliases.Taxonomy values):
# "split" keeps every ATT&CK group apart (Andariel, APT38, Lazarus Group); "umbrella" folds
# sub-groups into their umbrella. Split is the default because it loses nothing: names are
# stored split and can be folded at query time, never unfolded.
TAXONOMY_ENV_VAR = "EARMARK_TAXONOMY"
DEFAULT_TAXONOMY = "split"
