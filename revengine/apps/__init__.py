"""Applications built on revengine (the `revengine` commands and their recipes). They may import
every layer below them (revengine, revengine.models, revengine.convert); nothing below imports them."""
