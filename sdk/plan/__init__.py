"""Planning from the config alone: `costs` (memory and speed of a model compressed one way on a
device) and `planner` (the least lossy option that fits, with its reasons)."""
