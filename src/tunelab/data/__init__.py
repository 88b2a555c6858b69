"""The data layer: read -> records -> render -> tokenize -> collate (+ stats, split)."""
