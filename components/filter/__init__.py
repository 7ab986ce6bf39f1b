"""Rule filter: DataComp "basic" caption and image rules, boilerplate patterns, exact-duplicate images."""
