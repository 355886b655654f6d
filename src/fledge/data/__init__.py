"""Data tools: from a user's files to checked training rows.

    extract    folder -> rows of text with file and line     fledge.data.extract.extract
    pairs      expressions -> input/output rows              fledge.data.pairs.make_pairs
    synth      templates with slots -> exactly N rows        fledge.data.synthesize.synthesize
    check      rows -> errors and warnings with file:line    fledge.data.check.check
    split      rows -> train/val without leakage             fledge.data.split.split
    merge      sources -> one deduplicated file              fledge.data.split.merge

Every tool is a library function first; `fledge data ...` (commands.py) only parses and prints.
`records.py` reads every row format the fine-tuning stage accepts into one view (`Record`),
`sources.py` finds the input files and reads their rows strictly (a hostile row is an invalid
row at its file:line, never a crash), and `dedupe.py` finds exact and near duplicates (MinHash
with LSH banding).
"""

from fledge.data.check import CheckConfig, CheckReport, check
from fledge.data.dedupe import DuplicateIndex, NearOptions
from fledge.data.extract import ExtractConfig, extract
from fledge.data.pairs import make_pairs, read_expressions
from fledge.data.records import FieldMap, Record, RowProblem, read_records, scan_file, write_jsonl
from fledge.data.split import MergeOptions, SplitOptions, merge, split
from fledge.data.synthesize import load_synth_spec, synthesize

__all__ = ["CheckConfig", "CheckReport", "DuplicateIndex", "ExtractConfig", "FieldMap", "MergeOptions",
           "NearOptions", "Record", "RowProblem", "SplitOptions", "check", "extract", "load_synth_spec",
           "make_pairs", "merge", "read_expressions", "read_records", "scan_file", "split", "synthesize",
           "write_jsonl"]
