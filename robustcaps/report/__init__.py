"""Tables (CSV/JSON) and seaborn figures built from per-sample records."""
