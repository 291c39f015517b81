from results_svc.server import main

main()
