from randmask.cli import main

main()
