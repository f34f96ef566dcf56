"""What a deployment needs: the artifact on disk (:mod:`.artifact`, its manifest schema
:mod:`.manifest`, signatures :mod:`.signing`), the session that runs it (:mod:`.session`) and the
accuracy protocol (:mod:`.evaluation`). Nothing here imports the compile path."""
