"""Data: everything a command reads or builds before a model runs, below stats, repair, train and eval
(it imports none of them).

- ``jsonl``: JSON Lines files: read (errors name the file and line) and written (atomically).
- ``samples``: prompt/response or pre-tokenized lines -> right-padded token arrays (``Samples``),
  preference pairs (``PairSamples``); the line formats of docs/method.md, checked before any model loads.
- ``benchmarks``: the benchmark table, where each benchmark's files are found, their readers, and the
  fixed calibration / development / evaluation split (``split_of``), with ``select`` and ``order_key``.
- ``answers``: answer normalisation and matching (gold answer contained, exact match).
- ``calibration``: ``hcnr repair``'s honesty and task samples and the training questions of M0/M1, drawn
  from the calibration pool only (``calibration_pool``).
- ``recipes``: honesty training data (RAIT, Alignment for Honesty, preference pairs) from benchmark rows
  and, where a recipe needs them, a model's answers given as arguments.
- ``tasks``: the user's own prompt/response files: an evaluation task (``hcnr eval --task-data``) and
  in-context demonstrations (``hcnr eval --demos``).
- ``catalog``: the generated catalogue task (a house record format no base model knows).
"""
