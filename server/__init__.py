"""DVReward server: reward math, model engines, queue, API and workers."""
