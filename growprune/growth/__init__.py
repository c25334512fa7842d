"""Growth: where new channels live (:mod:`~growprune.growth.units`) and how they get their values
(:mod:`~growprune.growth.initializers`)."""

from growprune.growth.initializers import (INITIALIZERS, Firefly, GradMax, GradMaxOpt, GrowthInitializer, RandomInit,
                                           new_unit_gradient_norm)
from growprune.growth.units import NewUnits, UnitGroup, UnitSlice, group_units, new_units

__all__ = ["Firefly", "GradMax", "GradMaxOpt", "GrowthInitializer", "INITIALIZERS", "NewUnits", "RandomInit", "UnitGroup",
           "UnitSlice", "group_units", "new_unit_gradient_norm", "new_units"]
