from pagedlm.entrypoints.cli import main

main()
