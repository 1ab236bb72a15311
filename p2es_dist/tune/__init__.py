"""Ray Tune searches over Ray Train runs (`p2es tune`): search-space files and the search itself."""
