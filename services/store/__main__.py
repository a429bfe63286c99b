from services.store.main import main

main()
