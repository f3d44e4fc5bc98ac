"""The app's screens: runs (home), run detail, logs, compare, mixture builder, stage plan, launch, nodes."""
