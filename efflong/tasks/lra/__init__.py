"""Long Range Arena (Tay et al. 2020): the data and task classes of its five tasks."""
