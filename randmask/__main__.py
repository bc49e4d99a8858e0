from randmask.recipes.cli import main

main()
