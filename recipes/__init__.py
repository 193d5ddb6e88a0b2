"""Training recipes (--recipe) and their registry: what a training paradigm needs (dataset and sampler, loss,
step, what checkpoints keep to resume), behind the interface of recipes/base.py. To add one: a file like
triplets.py and one line below."""
from recipes import cosplace, places, triplets
from recipes.base import RecipeEntry

RECIPES = {
    "triplets": RecipeEntry(triplets.TripletsRecipe, triplets.OPTIONS, triplets.check, triplets.run_check),
    "places": RecipeEntry(places.PlacesRecipe, places.OPTIONS, places.check, places.run_check),
    "cosplace": RecipeEntry(cosplace.CosPlaceRecipe, cosplace.OPTIONS, cosplace.check, cosplace.run_check),
}
