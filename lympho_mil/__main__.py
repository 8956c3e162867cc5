from lympho_mil.cli import main

main()
