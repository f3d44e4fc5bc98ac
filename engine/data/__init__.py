"""Data path: sources → tokenize → pack into token shards + manifest → per-stage mixture order."""
