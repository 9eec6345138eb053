"""Jobs: the output folders, logs, iteration files and --continue of refine, class3d, class2d
and reconstruct, each a schedule over the E/M engine (`cryomap.em`)."""
