"""The README quickstart: store a conversation, then continue it by id."""

from convo import ConversationStore

store = ConversationStore()  # CONVO_DATABASE_URL, else the embedded SQLite file
conv = store.create(
    system="You are a concise travel assistant.",
    title="Lisbon trip",
    user_id="user-42",
    metadata={"plan": "pro"},
)
conv.add("user", "Three things to do in Lisbon?")
conv.add("assistant", "Ride tram 28, see Belém, and hear fado in Alfama.")

# Later, in another process or on another machine: continue by id.
same = store.get(conv.id)
same.add("user", "Which of those is best at night?")
for message in same.history():
    print(message.seq, message.role, message.text)

conv.update(title="Lisbon, 3 days")
print([c.title for c in store.list(user_id="user-42")])
