from inrank_convert.cli.app import main

main()
