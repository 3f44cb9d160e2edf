"""Label requests: which logged predictions a person should label, under a budget, and the answers back.

- `config`   the budget and the annotation tool's settings (typed, checked);
- `requests` the request queue in the state DB (what was asked, sent, answered, skipped, expired) and
             the budget's accounting;
- `select`   which rows to ask about: a uniform random confirmation sample, or an informative
             training batch (margin on calibrated probabilities, spread over the pooled embeddings);
- `answers`  answers from any tool, through the same path as `/feedback` (core/predlog.py);
- `studio`   the Label Studio adapter (projects, tasks with the model's guess, webhook, polling);
- `transfer` CSV/JSONL export and import for teams with another tool.
"""
